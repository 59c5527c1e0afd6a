#!/usr/bin/env node
/**
 * The `mooncake` command line.
 *
 *   mooncake demo                     two engines in two processes move 1 GiB over loopback
 *   mooncake metadata-server          an HTTP metadata server
 *   mooncake bench --mode target|initiator ...   Mooncake's transfer_engine_bench
 *   mooncake bench-raw --mode target|initiator ...   the raw TCP socket baseline
 *   mooncake topology                 the host's devices and NIC priority matrix
 *   mooncake p2p register|get|list|unregister   checkpoints through the P2P store
 */
import { spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { dirname, resolve } from 'node:path'
import { createInterface } from 'node:readline'
import { parseArgs } from 'node:util'

import type { BenchReport } from './binding'
import { describeTopology, memcpyBench, rawPumpRun, rawPumpServe } from './native'
import { benchStore } from './bench-store'
import { nativeAsync, native, MooncakeError } from './errors'
import { segmentHandle, TransferEngine, type TransferRequest } from './engine'
import { MasterServer, type MasterServerOptions } from './master'
import { startMetadataServer } from './metadata-server'
import { p2p } from './p2p-cli'
import { startProgress } from './progress'
import { MooncakeStore } from './store'

const USAGE = `usage: mooncake <command> [options]
       mooncake <command> --help   mooncake --version

commands:
  serve             all-in-one: master, metadata server and one store node on this host
                      --host 127.0.0.1   --rpc-port 50051   --metrics-port 9003   --metadata-port 8080
                      --global-segment-size 1GiB   --data-dir ./mooncake-data   (--no-data-dir: in memory)
                      --token-file <data dir>/cluster-token (made on first start, mode 0600)
                      (--no-token: open to anyone who reaches the ports, as Mooncake is)
  master            the Mooncake Store master
                      --rpc-address 127.0.0.1   --rpc-port 50051   --metrics-port 9003   --admin-address 127.0.0.1
                      --cluster-token-file FILE   --admin-token-file FILE   (default MC_CLUSTER_TOKEN, MC_ADMIN_TOKEN)
                      --tls-cert cert.pem --tls-key key.pem   (gRPC and admin HTTP over TLS)
                      --enable-http-metadata-server   --http-metadata-server-port 8080
                      --default-kv-lease-ttl 10s   --default-kv-soft-pin-ttl 30m   --max-kv-soft-pin-ttl 24h
                      --eviction-high-watermark-ratio 0.9   --eviction-ratio 0.05   --client-ttl 10s
                      --allocation-strategy random|free_ratio_first|local_first
                      --put-start-discard-timeout-sec 30   --put-start-release-timeout-sec 600
                      --data-dir DIR   (a restarted master recovers every acknowledged object)
                      --enable-ha --etcd-endpoints 'h1:2379;h2:2379' --cluster-id mooncake_cluster
                      --mooncake-rpc-port 50051   (also serve Mooncake's own protocol, for its Python clients)
                      --mooncake-rpc-address 127.0.0.1   --allow-mooncake-clients (with a cluster token)
                      (Mooncake's underscore spellings, --rpc_port and so on, work too)
  demo              two engines in two processes move 1 GiB over loopback and report throughput
  metadata-server   run an HTTP metadata server   [--host 127.0.0.1] [--port 8080] [--cluster-token-file FILE]
  bench             Mooncake's transfer_engine_bench
                      --mode target|initiator   --metadata P2PHANDSHAKE|http://host:port/metadata
                      --local-server-name 127.0.0.1   --segment <target name>   --protocol auto|tcp|shm
                      --op read|write   --block-size 65536   --batch-size 128   --threads 4
                      --duration 10   --buffer-size 256MiB   --json   --via-js
  bench-raw         raw TCP socket pump, the baseline
                      --mode target|initiator   --host 127.0.0.1   --port N   --op read|write
                      --block-size 65536   --duration 10   --buffer-size 256MiB   --json
  bench-store       store put/get from client processes against node processes, and Redis
                      (through ioredis and through redis-benchmark)
                      --nodes 2   --clients 1,2 (a list)   --node-size 1024 (MiB)   --staging 1024 (MiB, per client)
                      --sizes 4096,65536,1048576,4194304   --protocol auto|tcp|shm
                      --duration 2   --inflight 4   --repeat 3   --json   --chart out.svg
                      --baseline mooncake   (also Mooncake's own store, from its PyPI wheel; needs a clone)
  bench-memcpy      single-threaded memcpy of the same blocks, the same-host ceiling
                      --block-size 65536   --duration 10   --buffer-size 256MiB   --json
  p2p               checkpoints as files through the P2P store: register, get, list, unregister
                      (mooncake p2p help)
  token             print a fresh cluster token (64 hex characters)
  topology          this host's NUMA nodes, RDMA NICs, interfaces, GPUs and NIC priority matrix
                      --json   --root <sysfs tree root> (default /)   (MC_TE_FILTERS limits the NICs)
`

/** A usage mistake: reported with a pointer to the command's help, exit status 2. */
class UsageError extends MooncakeError {
  constructor(message: string) {
    super('ERR_INVALID_ARGUMENT', message)
  }
}

/** `text` as a whole number within `[min, max]`, or a usage error naming `flag`. */
function integer(text: string, flag: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const value = Number(text)
  if (!/^\s*-?\d+\s*$/.test(text) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new UsageError(`--${flag} needs a whole number from ${min} to ${max}, not '${text}'`)
  }
  return value
}

/** `text` as a TCP port (0 picks a free one). */
function port(text: string, flag: string): number {
  return integer(text, flag, 0, 65535)
}

/** `text` as a port, or -1 (off) where the option allows it. */
function portOrOff(text: string, flag: string): number {
  return text.trim() === '-1' ? -1 : port(text, flag)
}

/** `text` as a number (ratios, fractions), or a usage error naming `flag`. */
function decimal(text: string, flag: string): number {
  const value = Number(text)
  if (text.trim() === '' || !Number.isFinite(value)) {
    throw new UsageError(`--${flag} needs a number, not '${text}'`)
  }
  return value
}

function parseSize(text: string): number {
  const match = /^(\d+(?:\.\d+)?)\s*([kmgt]i?b?)?$/i.exec(text.trim())
  if (!match) throw new MooncakeError('ERR_INVALID_ARGUMENT', `not a size: '${text}'`)
  const unit = (match[2] ?? '').toLowerCase()[0]
  const scale = unit === 'k' ? 2 ** 10 : unit === 'm' ? 2 ** 20 : unit === 'g' ? 2 ** 30 : unit === 't' ? 2 ** 40 : 1
  return Math.round(Number(match[1]) * scale)
}

/** Milliseconds from `500ms`, `10s`, `5m`, `1h`, or a bare number of `bareUnit` ms. */
function parseDuration(text: string, bareUnit = 1): number {
  const match = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/.exec(text.trim())
  if (!match) throw new MooncakeError('ERR_INVALID_ARGUMENT', `not a duration: '${text}'`)
  const scale = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[match[2] as 'ms' | 's' | 'm' | 'h'] ?? bareUnit
  return Number(match[1]) * scale
}

/** Resolves on SIGINT or SIGTERM, keeping the process alive until then. */
function untilSignal(): Promise<void> {
  const keepAlive = setInterval(() => undefined, 1 << 30)
  return new Promise((resolve) => {
    const stop = () => {
      clearInterval(keepAlive)
      resolve()
    }
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
  })
}

/** `latencyOf` says what p50/p99 time: one request (native loop) or one batch (via JS, where per-request completion is not observable). */
function printReport(label: string, report: BenchReport, json: boolean, extra: Record<string, unknown>): void {
  if (json) {
    console.log(JSON.stringify({ label, ...extra, ...report }))
    return
  }
  const latency = extra.latencyOf === undefined ? '' : ` ${String(extra.latencyOf)} latency p50 ${report.p50Us.toFixed(0)} µs, p99 ${report.p99Us.toFixed(0)} µs`
  console.log(
    `${label}: ${report.gbps.toFixed(2)} GB/s, ${Math.round(report.requestsPerSec)} requests/s,${latency} ` +
      `(${(report.bytes / 1e9).toFixed(2)} GB in ${report.seconds.toFixed(2)} s)`,
  )
}

const BENCH_OPTIONS = {
  mode: { type: 'string', default: 'initiator' },
  metadata: { type: 'string', default: 'P2PHANDSHAKE' },
  'local-server-name': { type: 'string', default: '127.0.0.1' },
  segment: { type: 'string' },
  protocol: { type: 'string', default: 'auto' },
  op: { type: 'string', default: 'read' },
  'block-size': { type: 'string', default: '65536' },
  'batch-size': { type: 'string', default: '128' },
  threads: { type: 'string', default: '4' },
  duration: { type: 'string', default: '10' },
  'buffer-size': { type: 'string', default: '256MiB' },
  'tcp-lanes': { type: 'string' },
  json: { type: 'boolean', default: false },
  'via-js': { type: 'boolean', default: false },
  host: { type: 'string', default: '127.0.0.1' },
  port: { type: 'string', default: '0' },
} as const

async function bench(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({ args: argv, options: BENCH_OPTIONS, strict: true })
  const engine = await TransferEngine.create({
    localServerName: o['local-server-name'],
    metadata: o.metadata,
    protocol: o.protocol as 'auto' | 'tcp' | 'shm',
    ...(o['tcp-lanes'] ? { tcpLanesPerPeer: integer(o['tcp-lanes'], 'tcp-lanes', 1, 64) } : {}),
  })
  try {
    const bufferSize = parseSize(o['buffer-size'])
    const buffer = engine.allocate(bufferSize)
    if (o.mode === 'target') {
      console.log(o.json ? JSON.stringify({ segment: engine.segmentName }) : `segment: ${engine.segmentName}`)
      await untilSignal()
      return
    }
    if (o.mode !== 'initiator') throw new MooncakeError('ERR_INVALID_ARGUMENT', `--mode must be target or initiator`)
    if (!o.segment) throw new MooncakeError('ERR_INVALID_ARGUMENT', '--segment is required in initiator mode')
    const segment = await engine.openSegment(o.segment)
    const remote = segment.buffers.reduce((a, b) => (b.length > a.length ? b : a))
    const op = o.op === 'write' ? 'write' : o.op === 'read' ? 'read' : undefined
    if (!op) throw new MooncakeError('ERR_INVALID_ARGUMENT', '--op must be read or write')
    const blockSize = parseSize(o['block-size'])
    const batchSize = integer(o['batch-size'], 'batch-size', 1)
    const threads = integer(o.threads, 'threads', 1, 1024)
    const duration = decimal(o.duration, 'duration')
    const load: JsLoad = { segment, remote, buffer, op, blockSize, batchSize, threads, duration }
    const report = o['via-js'] ? await benchViaJs(engine, load, !o.json) : await benchNative(engine, load, !o.json)
    printReport(o['via-js'] ? 'engine (via js)' : 'engine', report, o.json, {
      op,
      blockSize,
      batchSize,
      threads,
      latencyOf: o['via-js'] ? 'batch' : 'request',
    })
  } finally {
    await engine.close()
  }
}

interface JsLoad {
  segment: Awaited<ReturnType<TransferEngine['openSegment']>>
  remote: { address: bigint; length: number }
  buffer: Buffer
  op: 'read' | 'write'
  blockSize: number
  batchSize: number
  threads: number
  duration: number
}

/** A timed run's progress line: seconds elapsed of the duration, and the rate so far. */
function timedProgress(duration: number, enabled: boolean, read: () => { bytes: number; seconds: number }) {
  return startProgress({ total: Math.ceil(duration), unit: 's', enabled }, () => {
    const { bytes, seconds } = read()
    return { done: Math.floor(seconds), bytes, seconds }
  })
}

/** The load in Rust, with a progress line (on a terminal) from what it has completed. */
async function benchNative(engine: TransferEngine, load: JsLoad, showProgress: boolean): Promise<BenchReport> {
  const run = native(() =>
    engine.native.startBench({
      segment: segmentHandle(load.segment)!,
      remoteAddress: load.remote.address,
      remoteLength: load.remote.length,
      local: load.buffer,
      op: load.op,
      blockSize: load.blockSize,
      batchSize: load.batchSize,
      threads: load.threads,
      durationSec: load.duration,
    }),
  )
  const progress = timedProgress(load.duration, showProgress, () => run.progress())
  try {
    return await nativeAsync(() => run.done())
  } finally {
    progress.stop()
  }
}

/** The same load as the native bench, driven through the TypeScript facade. */
async function benchViaJs(engine: TransferEngine, load: JsLoad, showProgress: boolean): Promise<BenchReport> {
  const slots = Math.min(Math.floor(load.remote.length / load.blockSize), Math.floor(load.buffer.length / load.blockSize))
  if (slots === 0) throw new MooncakeError('ERR_INVALID_ARGUMENT', 'buffers are smaller than one block')
  const latencies: number[] = []
  let bytes = 0
  const start = process.hrtime.bigint()
  const stopAt = start + BigInt(Math.round(load.duration * 1e9))
  const worker = async (tid: number): Promise<void> => {
    for (let round = 0; process.hrtime.bigint() < stopAt; round++) {
      const requests: TransferRequest[] = []
      for (let i = 0; i < load.batchSize; i++) {
        const slot = ((round * load.batchSize + i) * load.threads + tid) % slots
        requests.push({
          op: load.op,
          segment: load.segment,
          local: load.buffer,
          localOffset: slot * load.blockSize,
          remoteAddress: load.remote.address + BigInt(slot * load.blockSize),
          length: load.blockSize,
        })
      }
      const began = process.hrtime.bigint()
      await engine.transfer(requests)
      latencies.push(Number(process.hrtime.bigint() - began) / 1e3)
      bytes += load.blockSize * load.batchSize
    }
  }
  const elapsed = () => Number(process.hrtime.bigint() - start) / 1e9
  const progress = timedProgress(load.duration, showProgress, () => ({ bytes, seconds: elapsed() }))
  try {
    await Promise.all(Array.from({ length: load.threads }, (_, tid) => worker(tid)))
  } finally {
    progress.stop()
  }
  const seconds = elapsed()
  latencies.sort((a, b) => a - b)
  const pct = (p: number) => (latencies.length ? latencies[Math.round((latencies.length - 1) * p)] : 0)
  const requests = latencies.length * load.batchSize
  return { bytes, requests, seconds, gbps: bytes / seconds / 1e9, requestsPerSec: requests / seconds, p50Us: pct(0.5), p99Us: pct(0.99) }
}

async function benchRaw(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({ args: argv, options: BENCH_OPTIONS, strict: true })
  const bufferSize = parseSize(o['buffer-size'])
  if (o.mode === 'target') {
    const listening = native(() => rawPumpServe(o.host, port(o.port, 'port'), bufferSize))
    const address = `${o.host}:${listening}`
    console.log(o.json ? JSON.stringify({ segment: address }) : `segment: ${address}`)
    await untilSignal()
    process.exit(0)
  }
  if (!o.segment) throw new MooncakeError('ERR_INVALID_ARGUMENT', '--segment host:port is required in initiator mode')
  const blockSize = parseSize(o['block-size'])
  const report = await nativeAsync(() => rawPumpRun(o.segment!, o.op, blockSize, bufferSize, decimal(o.duration, 'duration')))
  printReport('raw tcp', report, o.json, { op: o.op, blockSize })
}

async function benchMemcpy(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({ args: argv, options: BENCH_OPTIONS, strict: true })
  const blockSize = parseSize(o['block-size'])
  const report = await nativeAsync(() => memcpyBench(blockSize, parseSize(o['buffer-size']), decimal(o.duration, 'duration')))
  printReport('memcpy', report, o.json, { blockSize })
}

const MASTER_OPTIONS = {
  'rpc-address': { type: 'string', default: '127.0.0.1' },
  'rpc-port': { type: 'string', default: '50051' },
  'metrics-port': { type: 'string', default: '9003' },
  'admin-address': { type: 'string', default: '127.0.0.1' },
  'enable-http-metadata-server': { type: 'boolean', default: false },
  'http-metadata-server-port': { type: 'string', default: '8080' },
  'default-kv-lease-ttl': { type: 'string' },
  'default-kv-soft-pin-ttl': { type: 'string' },
  'max-kv-soft-pin-ttl': { type: 'string' },
  'allow-evict-soft-pinned-objects': { type: 'string' },
  'eviction-high-watermark-ratio': { type: 'string' },
  'eviction-ratio': { type: 'string' },
  'client-ttl': { type: 'string' },
  'allocation-strategy': { type: 'string' },
  'put-start-discard-timeout-sec': { type: 'string' },
  'put-start-release-timeout-sec': { type: 'string' },
  'data-dir': { type: 'string' },
  'enable-ha': { type: 'boolean', default: false },
  'etcd-endpoints': { type: 'string' },
  'ha-backend-connstring': { type: 'string' },
  'cluster-id': { type: 'string' },
  'cluster-token-file': { type: 'string' },
  'admin-token-file': { type: 'string' },
  'tls-cert': { type: 'string' },
  'tls-key': { type: 'string' },
  'mooncake-rpc-port': { type: 'string' },
  'mooncake-rpc-address': { type: 'string', default: '127.0.0.1' },
  'allow-mooncake-clients': { type: 'boolean', default: false },
} as const

/** A fresh cluster token. */
function newToken(): string {
  return randomBytes(32).toString('hex')
}

/** The token in `path`, or undefined without a path. */
function readToken(path: string | undefined): string | undefined {
  if (path === undefined) return undefined
  const token = readFileSync(path, 'utf8').trim()
  // An empty file must never mean "no token".
  if (token === '') throw new MooncakeError('ERR_INVALID_ARGUMENT', `token file '${path}' is empty`)
  return token
}

/** The token in `path`, made there (mode 0600) when the file does not exist yet. */
function tokenAt(path: string): { token: string; made: boolean } {
  if (existsSync(path)) return { token: readToken(path)!, made: false }
  mkdirSync(dirname(path), { recursive: true })
  const token = newToken()
  writeFileSync(path, `${token}\n`, { mode: 0o600, flag: 'wx' })
  return { token, made: true }
}

/** Mooncake spells flags with underscores; accept both. */
function dashed(argv: string[]): string[] {
  return argv.map((arg) => (arg.startsWith('--') ? arg.replace(/_/g, '-') : arg))
}

function masterOptions(argv: string[]): MasterServerOptions {
  const { values: o } = parseArgs({ args: dashed(argv), options: MASTER_OPTIONS, strict: true })
  const number = (text: string | undefined, flag: string) => (text === undefined ? undefined : decimal(text, flag))
  const ms = (text: string | undefined, bareUnit = 1) => (text === undefined ? undefined : parseDuration(text, bareUnit))
  return {
    host: o['rpc-address'],
    rpcPort: port(o['rpc-port'], 'rpc-port'),
    metricsPort: portOrOff(o['metrics-port'], 'metrics-port'),
    adminHost: o['admin-address'],
    httpMetadataServer: o['enable-http-metadata-server'],
    httpMetadataPort: port(o['http-metadata-server-port'], 'http-metadata-server-port'),
    defaultKvLeaseTtlMs: ms(o['default-kv-lease-ttl']),
    defaultKvSoftPinTtlMs: ms(o['default-kv-soft-pin-ttl']),
    maxKvSoftPinTtlMs: ms(o['max-kv-soft-pin-ttl']),
    allowEvictSoftPinnedObjects: o['allow-evict-soft-pinned-objects'] === undefined ? undefined : o['allow-evict-soft-pinned-objects'] !== 'false',
    evictionHighWatermarkRatio: number(o['eviction-high-watermark-ratio'], 'eviction-high-watermark-ratio'),
    evictionRatio: number(o['eviction-ratio'], 'eviction-ratio'),
    clientTtlMs: ms(o['client-ttl'], 1000),
    allocationStrategy: o['allocation-strategy'] as MasterServerOptions['allocationStrategy'],
    putStartDiscardTimeoutMs: ms(o['put-start-discard-timeout-sec'], 1000),
    putStartReleaseTimeoutMs: ms(o['put-start-release-timeout-sec'], 1000),
    dataDir: o['data-dir'],
    enableHa: o['enable-ha'],
    etcdEndpoints: o['etcd-endpoints'] ?? o['ha-backend-connstring'],
    clusterId: o['cluster-id'],
    // With HA, Mooncake advertises --rpc_address: clients must reach it.
    advertiseAddress: o['enable-ha'] && o['rpc-address'] !== '0.0.0.0' ? `${o['rpc-address']}:${o['rpc-port']}` : undefined,
    clusterToken: readToken(o['cluster-token-file']),
    adminToken: readToken(o['admin-token-file']),
    tlsCert: o['tls-cert'],
    tlsKey: o['tls-key'],
    mooncakeRpcPort: o['mooncake-rpc-port'] === undefined ? undefined : port(o['mooncake-rpc-port'], 'mooncake-rpc-port'),
    mooncakeRpcHost: o['mooncake-rpc-address'],
    allowMooncakeClients: o['allow-mooncake-clients'],
  }
}

async function master(argv: string[]): Promise<void> {
  const server = await MasterServer.start(masterOptions(argv))
  console.log(`master: ${server.address}`)
  if (server.mooncakeRpcAddress) console.log(`Mooncake RPC: ${server.mooncakeRpcAddress}`)
  if (server.metricsUrl) console.log(`metrics: ${server.metricsUrl}`)
  if (server.metadataUrl) console.log(`metadata server: ${server.metadataUrl}`)
  await untilSignal()
  await server.close()
}

/** The main job: master, metadata server and one store node, serving until stopped. */
async function serve(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({
    args: dashed(argv),
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      'rpc-port': { type: 'string', default: '50051' },
      'metrics-port': { type: 'string', default: '9003' },
      'metadata-port': { type: 'string', default: '8080' },
      'global-segment-size': { type: 'string', default: '1GiB' },
      'data-dir': { type: 'string', default: 'mooncake-data' },
      'no-data-dir': { type: 'boolean', default: false },
      'token-file': { type: 'string' },
      'no-token': { type: 'boolean', default: false },
    },
    strict: true,
  })
  const dataDir = o['no-data-dir'] ? undefined : resolve(o['data-dir'])
  const tokenFile = o['no-token'] ? undefined : resolve(o['token-file'] ?? resolve(dataDir ?? '.', 'cluster-token'))
  const token = tokenFile === undefined ? undefined : tokenAt(tokenFile)
  const clusterToken = token?.token ?? ''
  const server = await MasterServer.start({
    clusterToken,
    host: o.host,
    rpcPort: port(o['rpc-port'], 'rpc-port'),
    metricsPort: portOrOff(o['metrics-port'], 'metrics-port'),
    httpMetadataServer: true,
    httpMetadataPort: port(o['metadata-port'], 'metadata-port'),
    dataDir,
  })
  const node = await MooncakeStore.connect({
    masterAddress: server.address,
    metadata: server.metadataUrl!,
    localServerName: `${o.host}-node-0`,
    ipOrHostName: o.host,
    globalSegmentSize: parseSize(o['global-segment-size']),
    clusterToken,
  })
  console.log(`master:          ${server.address}`)
  console.log(`metadata server: ${server.metadataUrl}`)
  console.log(`metrics:         ${server.metricsUrl}`)
  console.log(`metadata log:    ${dataDir ?? 'none (in memory)'}`)
  console.log(`store node:      ${node.segmentName} (${o['global-segment-size']} in the pool)`)
  if (token === undefined) {
    console.log('cluster token:   none (--no-token): anyone who reaches these ports may read, write and remove')
  } else {
    console.log(`cluster token:   ${token.token}`)
    console.log(`                 ${token.made ? 'made and written to' : 'read from'} ${tokenFile} (mode 0600)`)
  }
  console.log('')
  console.log('connect from Node.js:')
  const tokenOption = token === undefined ? '' : `, clusterToken: readFileSync('${tokenFile}', 'utf8').trim()`
  console.log(
    `  const store = await MooncakeStore.connect({ masterAddress: '${server.address}', metadata: '${server.metadataUrl}', localServerName: 'my-node', ipOrHostName: '${o.host}'${tokenOption} })`,
  )
  console.log('serving; Ctrl-C to stop')
  await untilSignal()
  await node.close()
  await server.close()
}

async function metadataServer(argv: string[]): Promise<void> {
  const { values: o } = parseArgs({
    args: argv,
    options: {
      host: { type: 'string', default: '127.0.0.1' },
      port: { type: 'string', default: '8080' },
      'cluster-token-file': { type: 'string' },
    },
  })
  const server = await startMetadataServer({ host: o.host, port: port(o.port, 'port'), clusterToken: readToken(o['cluster-token-file']) })
  console.log(`metadata server: ${server.url}`)
  await untilSignal()
  await server.close()
}

/** The main job: a target process and this one move 1 GiB each way and verify it. */
async function demo(): Promise<void> {
  const size = 1 << 30
  const target = spawn(process.execPath, [__filename, 'bench', '--mode', 'target', '--buffer-size', String(size), '--json'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  try {
    const line = await new Promise<string>((resolve, reject) => {
      createInterface({ input: target.stdout! }).once('line', resolve)
      target.once('exit', (code) => reject(new MooncakeError('ERR_SOCKET', `target exited with ${code}`)))
    })
    const segmentName = (JSON.parse(line) as { segment: string }).segment
    console.log(`target process ${target.pid} serves segment ${segmentName}`)
    const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE' })
    try {
      const source = engine.allocate(size)
      for (let i = 0; i < size; i += 4096) source.writeUInt32LE((i * 2654435761) >>> 0, i)
      const back = engine.allocate(size)
      const segment = await engine.openSegment(segmentName)
      const remote = segment.buffers[0]
      // The first pass also faults in the pages of fresh memory on both sides; the second
      // shows the steady state.
      for (const pass of ['first pass (fresh memory)', 'second pass']) {
        for (const op of ['write', 'read'] as const) {
          const began = process.hrtime.bigint()
          if (op === 'write') await engine.write(segment, source, remote.address)
          else await engine.read(segment, back, remote.address)
          const seconds = Number(process.hrtime.bigint() - began) / 1e9
          console.log(`${pass}: ${op} 1 GiB in ${(seconds * 1e3).toFixed(0)} ms, ${(size / seconds / 1e9).toFixed(2)} GB/s`)
        }
      }
      const same = source.equals(back)
      console.log(same ? 'verified: the bytes read back equal the bytes written' : 'MISMATCH between written and read bytes')
      if (!same) process.exitCode = 1
    } finally {
      await engine.close()
    }
  } finally {
    target.kill('SIGTERM')
  }
}

function topology(args: string[]): void {
  const { values } = parseArgs({ args, options: { json: { type: 'boolean' }, root: { type: 'string' } } })
  const report = native(() => describeTopology(values.root, values.json))
  process.stdout.write(values.json ? `${JSON.stringify(JSON.parse(report), null, 2)}\n` : report)
}

/** The help of `command`: its lines of the usage. */
function commandHelp(command: string): string | undefined {
  const lines = USAGE.split('\n')
  const start = lines.findIndex((l) => new RegExp(`^  ${command}\\s`).test(l) || l === `  ${command}`)
  if (start < 0) return undefined
  const end = lines.findIndex((l, i) => i > start && /^  \S/.test(l))
  return `usage: mooncake ${command} [options]\n\n${lines.slice(start, end < 0 ? undefined : end).join('\n')}\n`
}

function version(): string {
  const manifest = JSON.parse(readFileSync(resolve(__dirname, '..', 'package.json'), 'utf8')) as { version: string }
  return manifest.version
}

async function main(): Promise<void> {
  const [command, ...rest] = process.argv.slice(2)
  const helpWanted = rest.includes('--help') || rest.includes('-h')
  if (command !== undefined && command !== 'p2p' && helpWanted) {
    const help = commandHelp(command)
    if (help === undefined) throw new UsageError(`unknown command '${command}'`)
    process.stdout.write(help)
    return
  }
  switch (command) {
    case 'serve':
      return serve(rest)
    case 'master':
      return master(rest)
    case 'demo':
      if (rest.length > 0) throw new UsageError(`demo takes no options (got ${rest.join(' ')})`)
      return demo()
    case 'metadata-server':
      return metadataServer(rest)
    case 'bench':
      return bench(rest)
    case 'bench-raw':
      return benchRaw(rest)
    case 'bench-memcpy':
      return benchMemcpy(rest)
    case 'bench-store':
      return benchStore(rest)
    case 'topology':
      return topology(rest)
    case 'p2p':
      return p2p(helpWanted ? ['help'] : rest, { parseSize, readToken, untilSignal })
    case 'token':
      if (rest.length > 0) throw new UsageError(`token takes no options (got ${rest.join(' ')})`)
      console.log(newToken())
      return
    case '--version':
    case '-v':
    case 'version':
      console.log(version())
      return
    case undefined:
    case '--help':
    case '-h':
      process.stdout.write(USAGE)
      return
    case 'help': {
      const topic = rest[0]
      if (topic === undefined) {
        process.stdout.write(USAGE)
        return
      }
      if (topic === 'p2p') return p2p(['help'], { parseSize, readToken, untilSignal })
      const help = commandHelp(topic)
      if (help === undefined) throw new UsageError(`unknown command '${topic}'`)
      process.stdout.write(help)
      return
    }
    default:
      throw new UsageError(`unknown command '${command}'`)
  }
}

main().catch((error: unknown) => {
  const e = error instanceof MooncakeError ? error : error instanceof Error ? error : new Error(String(error))
  process.stderr.write(`mooncake: ${'code' in e ? `${e.code}: ` : ''}${e.message}\n`)
  // Exit status: 2 for a usage mistake (an unknown command or option, a malformed value), 1 for
  // a failure. Servers started before the failure would keep the process alive.
  const parse = 'code' in e && typeof e.code === 'string' && e.code.startsWith('ERR_PARSE_ARGS')
  if (error instanceof UsageError || parse) {
    const command = process.argv[2]
    process.stderr.write(command && commandHelp(command) ? `see: mooncake ${command} --help\n` : `see: mooncake help\n`)
    process.exit(2)
  }
  process.exit(1)
})
