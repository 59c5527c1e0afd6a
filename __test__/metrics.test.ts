import { spawnSync } from 'node:child_process'
import { once } from 'node:events'
import { existsSync } from 'node:fs'
import { createInterface } from 'node:readline'

import test, { type ExecutionContext } from 'ava'

import { MasterServer, MooncakeStore, TransferEngine, type TransferRequest } from '../src'
import { runFixture, startPeer, stopPeer, type PeerInfo } from './helpers'

const PROMTOOL = '/usr/bin/promtool'
/** Shows as skipped, never as passed, where promtool is not installed. */
const withPromtool = existsSync(PROMTOOL) ? test : test.skip

/** One sample line: name, labels, value. */
interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

function samples(text: string): Sample[] {
  return text
    .split('\n')
    .filter((line) => line && !line.startsWith('#'))
    .map((line) => {
      const match = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$/.exec(line)
      if (!match) throw new Error(`not a sample line: ${line}`)
      const labels: Record<string, string> = {}
      for (const [, key, value] of (match[2] ?? '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[key] = value
      return { name: match[1], labels, value: Number(match[3]) }
    })
}

/** The value of the sample of `name` whose labels include `labels`, or undefined. */
function value(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  const found = samples(text).filter((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v))
  return found.length ? found.reduce((sum, s) => sum + s.value, 0) : undefined
}

function checkWithPromtool(t: ExecutionContext, text: string): void {
  const result = spawnSync(PROMTOOL, ['check', 'metrics'], { input: text, encoding: 'utf8' })
  t.is(result.status, 0, `promtool check metrics: ${result.stdout}${result.stderr}`)
}

async function withPeer(body: (peer: PeerInfo, engine: TransferEngine) => Promise<void>): Promise<void> {
  const peer = await startPeer({ size: 4 << 20, seed: 3 })
  const engine = await TransferEngine.create({ localServerName: '127.0.0.1', metadata: 'P2PHANDSHAKE', protocol: 'tcp' })
  try {
    await body(peer, engine)
  } finally {
    await engine.close()
    await stopPeer(peer)
  }
}

/** Writes and reads of known sizes over TCP, and one read outside the peer's memory. */
async function engineLoad(peer: PeerInfo, engine: TransferEngine) {
  const segment = await engine.openSegment(peer.segment)
  const local = engine.allocate(1 << 20)
  const writes = [4096, 100_000, 65_536]
  const reads = [12_345, 1 << 20]
  const request = (op: 'read' | 'write', length: number, at: number): TransferRequest => ({ op, segment, local, localOffset: 0, remoteAddress: peer.address + BigInt(at), length })
  await engine.transfer(writes.map((length, i) => request('write', length, i << 20)))
  for (const length of reads) await engine.transfer([request('read', length, 0)])
  const outside = engine.submit([request('read', 4096, peer.length + (1 << 20))])
  await expectFailure(outside.done())
  return { writes, reads }
}

async function expectFailure(promise: Promise<unknown>): Promise<void> {
  try {
    await promise
  } catch {
    return
  }
  throw new Error('expected the transfer to fail')
}

test('engine metrics count each settled request, its bytes and latency by transport and direction', async (t) => {
  await withPeer(async (peer, engine) => {
    const before = engine.metrics()
    t.is(value(before, 'mooncake_engine_transfers_total'), 0)
    const { writes, reads } = await engineLoad(peer, engine)
    const text = engine.metrics()
    const tcp = (op: string) => ({ transport: 'tcp', op })
    const sum = (xs: number[]) => xs.reduce((a, b) => a + b, 0)

    t.is(value(text, 'mooncake_engine_transfers_total', tcp('write')), writes.length)
    t.is(value(text, 'mooncake_engine_transfers_total', tcp('read')), reads.length)
    t.is(value(text, 'mooncake_engine_transfer_bytes_total', tcp('write')), sum(writes))
    t.is(value(text, 'mooncake_engine_transfer_bytes_total', tcp('read')), sum(reads))
    t.is(value(text, 'mooncake_engine_transfer_duration_seconds_count', tcp('write')), writes.length)
    t.is(value(text, 'mooncake_engine_transfer_duration_seconds_bucket', { ...tcp('read'), le: '+Inf' }), reads.length)
    t.true(value(text, 'mooncake_engine_transfer_duration_seconds_sum', tcp('read'))! > 0)
    t.is(value(text, 'mooncake_engine_transfer_failures_total', tcp('read')), 0)
    t.is(value(text, 'mooncake_engine_transfer_failures_total', { transport: 'none', op: 'read' }), 1)
    t.is(value(text, 'mooncake_engine_transfers_total', { transport: 'shm' }), 0)

    // Every byte that moved went over some rail, and no rail is in trouble.
    t.is(value(text, 'mooncake_engine_rail_bytes_total'), sum(writes) + sum(reads))
    t.is(value(text, 'mooncake_engine_rail_failures_total'), 0)
    t.true(samples(text).some((s) => s.name === 'mooncake_engine_rail_usable' && s.value === 1))
    // The failed batch's handle may still await collection, so only its presence is certain.
    t.not(value(text, 'mooncake_engine_batches'), undefined)

    // The submitted counters behind stats() still agree.
    t.deepEqual(engine.stats().tcp, { requests: writes.length + reads.length, bytes: sum(writes) + sum(reads) })
    t.regex(text, /^# HELP mooncake_engine_transfers_total .+$/m)
    t.regex(text, /^# TYPE mooncake_engine_transfer_duration_seconds histogram$/m)
  })
})

withPromtool('engine metrics pass promtool check metrics', async (t) => {
  await withPeer(async (peer, engine) => {
    await engineLoad(peer, engine)
    checkWithPromtool(t, engine.metrics())
  })
})

/** A master in this process, one store node in its own, and a client without memory of its own. */
async function withStore(body: (store: MooncakeStore) => Promise<void>): Promise<void> {
  const master = await MasterServer.start({ rpcPort: 0, metricsPort: -1, httpMetadataServer: true, httpMetadataPort: 0 })
  const metadata = master.metadataUrl!
  const node = runFixture('store-node.ts', [JSON.stringify({ masterAddress: master.address, metadata, name: `metrics-node-${process.pid}`, size: 32 << 20 })])
  let store: MooncakeStore | undefined
  try {
    await once(createInterface({ input: node.stdout! }), 'line')
    store = await MooncakeStore.connect({
      masterAddress: master.address,
      metadata,
      localServerName: `metrics-client-${process.pid}`,
      ipOrHostName: '127.0.0.1',
      globalSegmentSize: 0,
      localBufferSize: 4 << 20,
    })
    await body(store)
  } finally {
    await store?.close()
    if (node.exitCode === null && node.signalCode === null) {
      node.kill('SIGTERM')
      await once(node, 'exit')
    }
    await master.close()
  }
}

/** Puts, gets (one of a missing key) and a remove of known sizes; returns what each moved. */
async function storeLoad(store: MooncakeStore) {
  const prefix = `metrics-${process.pid}`
  const copies = [1000, 65_536, 300_000]
  for (const [i, size] of copies.entries()) await store.put(`${prefix}/${i}`, Buffer.alloc(size, i + 1))
  const registered = store.allocate(200_000).fill(7)
  await store.putFrom(`${prefix}/zero-copy`, registered)
  const got = [await store.get(`${prefix}/0`), await store.get(`${prefix}/2`)]
  const into = store.allocate(200_000)
  const size = await store.getInto(`${prefix}/zero-copy`, into)
  await store.get(`${prefix}/missing`).catch(() => undefined)
  await store.remove(`${prefix}/1`)
  return { putBytes: copies.reduce((a, b) => a + b, 0) + registered.length, puts: copies.length + 1, gets: got, getBytes: got[0].length + got[1].length + size }
}

test('store metrics count puts, gets and removes per key with their bytes, and the engine under them', async (t) => {
  await withStore(async (store) => {
    const { putBytes, puts, gets, getBytes } = await storeLoad(store)
    const text = store.metrics()
    const op = (name: string) => ({ op: name })

    t.is(value(text, 'mooncake_client_requests_total', op('put')), puts)
    t.is(value(text, 'mooncake_client_failures_total', op('put')), 0)
    t.is(value(text, 'mooncake_client_bytes_total', op('put')), putBytes)
    t.is(value(text, 'mooncake_client_request_duration_seconds_count', op('put')), puts)

    t.is(value(text, 'mooncake_client_requests_total', op('get')), 4)
    t.is(value(text, 'mooncake_client_failures_total', op('get')), 1)
    t.is(value(text, 'mooncake_client_bytes_total', op('get')), getBytes)

    t.is(value(text, 'mooncake_client_requests_total', op('remove')), 1)
    t.is(value(text, 'mooncake_client_failures_total', op('remove')), 0)
    t.is(value(text, 'mooncake_client_bytes_total', op('remove')), undefined)

    // One replica each: the engine moved exactly the values, whichever transport it chose.
    t.is(value(text, 'mooncake_engine_transfer_bytes_total', op('write')), putBytes)
    t.is(value(text, 'mooncake_engine_transfer_bytes_total', op('read')), getBytes)
    t.is(value(text, 'mooncake_engine_transfers_total', op('write')), puts)

    // Two copying gets hold staging blocks while their Buffers live.
    t.is(value(text, 'mooncake_client_staging_capacity_bytes'), 4 << 20)
    t.true(value(text, 'mooncake_client_staging_used_bytes')! >= gets[0].length + gets[1].length)
    t.is(gets.length, 2)
  })
})

test('puts that never start (a closed client) are counted as failed puts', async (t) => {
  await withStore(async (store) => {
    await store.close()
    await t.throwsAsync(store.put(`metrics-${process.pid}/closed`, Buffer.alloc(1000, 9)))
    await t.throwsAsync(store.putFrom(`metrics-${process.pid}/closed-zero-copy`, Buffer.alloc(1000, 9)))
    const text = store.metrics()
    t.is(value(text, 'mooncake_client_requests_total', { op: 'put' }), 2)
    t.is(value(text, 'mooncake_client_failures_total', { op: 'put' }), 2)
    t.is(value(text, 'mooncake_client_bytes_total', { op: 'put' }), 0)
    t.is(value(text, 'mooncake_engine_transfers_total', { op: 'write' }) ?? 0, 0)
  })
})

withPromtool('store metrics pass promtool check metrics', async (t) => {
  await withStore(async (store) => {
    await storeLoad(store)
    checkWithPromtool(t, store.metrics())
  })
})
